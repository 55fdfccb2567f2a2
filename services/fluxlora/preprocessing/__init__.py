"""Dataset preparation: validate, decode, de-duplicate and crop photos to training buckets."""
