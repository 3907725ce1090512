"""Models: teachers and students from spec strings (timm), where features come out (taps), the
resolved preprocessing (``DataConfig``), and the device they run on."""
from .data_config import DataConfig, resolve_data_config
from .device import resolve_device
from .spec import ModelSpec, ModelSpecError
from .student import Student, create_student
from .taps import FeatureTap, probe
from .teacher import Teacher, create_teacher

__all__ = ["DataConfig", "FeatureTap", "ModelSpec", "ModelSpecError", "Student", "Teacher", "create_student",
           "create_teacher", "probe", "resolve_data_config", "resolve_device"]
