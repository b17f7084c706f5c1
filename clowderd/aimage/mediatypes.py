"""Media types and annotation keys of an aimage (OCI image manifest v1.1 + CNCF ModelPack layers)."""

# The manifest and its artifact type.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_SCHEMA_VERSION = 2
AIMAGE_ARTIFACT = "application/vnd.clowder.aimage.v1+json"

# The manifest's `config` descriptor: the aimage Configuration.
AIMAGE_CONFIG = "application/vnd.clowder.aimage.config.v1+json"

# Model layers: one file each, uncompressed (CNCF ModelPack).
MODEL_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MODEL_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MODEL_DOC = "application/vnd.cncf.model.doc.v1.raw"
MODEL_LAYER_TYPES = frozenset({MODEL_WEIGHT, MODEL_WEIGHT_CONFIG, MODEL_DOC})

# EP layers (LoRA/PEFT adapters).
EP_WEIGHT = "application/vnd.clowder.ep.weight.v1.raw"
EP_CONFIG = "application/vnd.clowder.ep.config.v1.raw"
EP_LAYER_TYPES = frozenset({EP_WEIGHT, EP_CONFIG})

# Annotations.
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_EP_NAME = "org.clowder.ep.name"
ANNOTATION_EP_BASE = "org.clowder.ep.base"
