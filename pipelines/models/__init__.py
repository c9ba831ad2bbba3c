"""Model zoo. Every module here registers its components on import (see neodragon_cli.registry)."""
