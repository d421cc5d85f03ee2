"""python benchmarks/world_check.py --num 2000 --out benchmarks/results/world_check.json

Verifier self-check of the synthetic world at 32 and 64 px (the figures in docs/RESULTS.md): target success and
attribute accuracy on clean renders, how often unedited sources fail each edit's target, success after the
documented degradation and after harsher ones, and single-process throughput. Run under `taskset -c 0` for the
one-core numbers.
"""

import argparse
import json
import pathlib
import platform

from editing_jax.data.world import check


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--out", default="benchmarks/results/world_check.json")
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "runs": []}
    for size in (int(s) for s in args.sizes.split(",")):
        report = check.check_world(num=args.num, size=size, seed=0, progress=True)
        results["runs"].append(report)
        print(json.dumps(report, sort_keys=True))
        # Harsher degradations than the documented one, reported for honesty (not targets).
        for blur, quality in ((size / 32.0, None), (0.0, 60)):
            harsh = check.check_world(num=min(args.num, 500), size=size, seed=1, blur_sigma=blur, jpeg_quality=quality)
            row = {k: harsh[k] for k in ("size", "num", "degradation", "degraded_psnr_db", "degraded_target_success")}
            results["runs"].append(row)
            print(json.dumps(row, sort_keys=True))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
