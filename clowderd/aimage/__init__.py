"""The aimage format: media types, references, configuration, manifests, model and adapter directories."""
