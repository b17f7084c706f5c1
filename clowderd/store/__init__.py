"""The content store: chunked, hashed, immutable blobs; names; model views; gc and fsck."""
