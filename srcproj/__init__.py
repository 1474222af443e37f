"""srcproj: training data attribution with SOURCE in a random-projection space."""

__version__ = "0.1.0"

from .attributor import Attributor, FeaturizeReport
from .counterfactual import Counterfactual
from .curation import Curation, curate
from .detection import MislabelScores, detect_mislabeled
from .errors import (
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    NonFiniteGradientError,
    SrcprojError,
    StoreError,
    StoreMismatchError,
)
from .language_models import LanguageModelTask, SequenceClassificationTask
from .method import AttributionMethod
from .optimizer import SGD, Adam, AdamW
from .projection import FastJLProjector, KroneckerProjector, MatrixProjector, Projector, RademacherProjector
from .recorder import TrajectoryRecorder, load_trajectory
from .scoring import TopK
from .tasks import ClassificationTask, RegressionTask, Task
from .trajectory import Segment, Trajectory
from .verify import VerifyReport, verify_store

__all__ = [
    "Attributor",
    "AttributionMethod",
    "Counterfactual",
    "FeaturizeReport",
    "Segment",
    "Trajectory",
    "TrajectoryRecorder",
    "load_trajectory",
    "SGD",
    "Adam",
    "AdamW",
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "LanguageModelTask",
    "SequenceClassificationTask",
    "Projector",
    "RademacherProjector",
    "KroneckerProjector",
    "MatrixProjector",
    "FastJLProjector",
    "TopK",
    "curate",
    "Curation",
    "detect_mislabeled",
    "MislabelScores",
    "SrcprojError",
    "ConfigurationError",
    "DataError",
    "CheckpointMismatchError",
    "NonFiniteGradientError",
    "StoreError",
    "StoreMismatchError",
    "verify_store",
    "VerifyReport",
]
