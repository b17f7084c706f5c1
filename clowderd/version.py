"""The clowderd version: the installed distribution's version, else the source tree's."""
from importlib import metadata

try:
    __version__ = metadata.version("clowder")
except metadata.PackageNotFoundError:  # running from a source checkout without `pip install`
    __version__ = "0.1.0+src"
