"""Model transforms: inline nested models, fuse, place quantizers."""
