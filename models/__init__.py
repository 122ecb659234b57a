"""models package: CineMA ConvViT backbone, checkpoint loading, adapters, policies and the LightningModule."""

from models.config import ConvViTConfig as ConvViTConfig
from models.convvit import ConvViT as ConvViT
from models.convvit import PrefixFeatures as PrefixFeatures
from models.loading import load_cinema as load_cinema
from models.loading import save_cinema as save_cinema
from models.policy import POLICY_NAMES as POLICY_NAMES
from models.policy import SharingPolicy as SharingPolicy
from models.policy import get_policy as get_policy
