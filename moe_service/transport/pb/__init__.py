"""Generated from protos/moe/v1/moe.proto by scripts/gen_protos.py; do not edit."""
