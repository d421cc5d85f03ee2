"""Pure, jittable samplers: MaskGIT decoding with region hold and in-graph attention-map tools."""
