"""Dasheng audio encoders for Hugging Face Transformers.

Importing this package registers the classes with the Auto classes under the model type `dasheng`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
)

from .configuration_dasheng import DASHENG_PRESETS, DashengConfig
from .feature_extraction_dasheng import DashengFeatureExtractor
from .modeling_dasheng import (
    DashengAudioClassificationPipeline,
    DashengForAudioClassification,
    DashengModel,
    DashengModelOutput,
    DashengPreTrainedModel,
)
from .modeling_dasheng_pretraining import DashengForPreTraining, DashengForPreTrainingOutput

__all__ = [
    "DASHENG_PRESETS",
    "DashengAudioClassificationPipeline",
    "DashengConfig",
    "DashengFeatureExtractor",
    "DashengForAudioClassification",
    "DashengForPreTraining",
    "DashengForPreTrainingOutput",
    "DashengModel",
    "DashengModelOutput",
    "DashengPreTrainedModel",
]

AutoConfig.register("dasheng", DashengConfig, exist_ok=True)
AutoModel.register(DashengConfig, DashengModel, exist_ok=True)
AutoModelForAudioClassification.register(DashengConfig, DashengForAudioClassification, exist_ok=True)
AutoModelForPreTraining.register(DashengConfig, DashengForPreTraining, exist_ok=True)
AutoFeatureExtractor.register(DashengConfig, DashengFeatureExtractor, exist_ok=True)
