"""fastres: fast, trustworthy CIFAR-10 ResNet training."""
from .config import Config, make_config
from .model import resnet, resnet20, resnet56, resnet68, resnet110

__all__ = ["Config", "make_config", "resnet", "resnet20", "resnet56", "resnet68", "resnet110"]
__version__ = "0.1.0"
