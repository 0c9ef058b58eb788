"""A small vision transformer (timm's `VisionTransformer`) with dense, LORS or tied blocks."""
from lors.models.vit.model import VitConfig, build_vit, load_vit_config

__all__ = ["VitConfig", "build_vit", "load_vit_config"]
