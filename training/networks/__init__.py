"""Networks: the SSL4MIS-capacity 2D U-Net."""

from mpcl.training.networks.unet import UNet, UNetOutput

__all__ = ["UNet", "UNetOutput"]
