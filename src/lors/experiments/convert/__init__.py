"""Converting pretrained transformers: one model (`run`), the comparison of forms (`bench`) and
what both measure with (`evaluate`)."""
