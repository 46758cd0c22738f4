"""Dasheng audio encoders for Hugging Face Transformers.

Importing this package is light (neither torch nor transformers), so that the command-line tools answer `--help` at
once. The public classes load on first use (`from dasheng_hf import DashengModel` imports them then), and the
package registers them with the Auto classes under the model type `dasheng` (`AutoConfig`, `AutoModel`,
`AutoModelForAudioClassification`, `AutoModelForPreTraining`, `AutoFeatureExtractor`) as soon as transformers'
Auto classes are loaded, whichever comes first: at once if they already are, otherwise when they are imported later
(an import hook that waits for those imports to finish, then removes itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_dasheng import DASHENG_PRESETS, DashengConfig
    from .feature_extraction_dasheng import DashengFeatureExtractor
    from .modeling_dasheng import (
        DashengAudioClassificationPipeline,
        DashengForAudioClassification,
        DashengModel,
        DashengModelOutput,
        DashengPreTrainedModel,
        DashengWeightShapeError,
    )
    from .modeling_dasheng_pretraining import DashengForPreTraining, DashengForPreTrainingOutput

# Public name -> the module (of this package) that defines it.
_EXPORTS = {
    "DASHENG_PRESETS": "configuration_dasheng",
    "DashengAudioClassificationPipeline": "modeling_dasheng",
    "DashengConfig": "configuration_dasheng",
    "DashengFeatureExtractor": "feature_extraction_dasheng",
    "DashengForAudioClassification": "modeling_dasheng",
    "DashengForPreTraining": "modeling_dasheng_pretraining",
    "DashengForPreTrainingOutput": "modeling_dasheng_pretraining",
    "DashengModel": "modeling_dasheng",
    "DashengModelOutput": "modeling_dasheng",
    "DashengPreTrainedModel": "modeling_dasheng",
    "DashengWeightShapeError": "modeling_dasheng",
}
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
    "DashengWeightShapeError",
    "register_auto_classes",
]

_HUB_MODULES = tuple(f"{__name__}.{module}" for module in sorted(set(_EXPORTS.values())))
_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_lock = threading.RLock()
_registered = False


def __getattr__(name: str) -> Any:
    """PEP 562: a public class is imported on first access (and the Auto classes learn about Dasheng then)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    register_auto_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def register_auto_classes() -> None:
    """Register the Dasheng classes with transformers' Auto classes (model type `dasheng`); idempotent. Happens by
    itself (see the package docstring); call it only to register at a moment of your choosing."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import (
            AutoConfig,
            AutoFeatureExtractor,
            AutoModel,
            AutoModelForAudioClassification,
            AutoModelForPreTraining,
        )

        from .configuration_dasheng import DashengConfig
        from .feature_extraction_dasheng import DashengFeatureExtractor
        from .modeling_dasheng import DashengForAudioClassification, DashengModel
        from .modeling_dasheng_pretraining import DashengForPreTraining

        AutoConfig.register("dasheng", DashengConfig, exist_ok=True)
        AutoModel.register(DashengConfig, DashengModel, exist_ok=True)
        AutoModelForAudioClassification.register(DashengConfig, DashengForAudioClassification, exist_ok=True)
        AutoModelForPreTraining.register(DashengConfig, DashengForPreTraining, exist_ok=True)
        AutoFeatureExtractor.register(DashengConfig, DashengFeatureExtractor, exist_ok=True)
        _registered = True
        _remove_hook()


def _watched(name: str) -> bool:
    """transformers and its submodules (not the `transformers_modules` of remote code), and our Hub modules."""
    return name == "transformers" or name.startswith("transformers.") or name in _HUB_MODULES


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_when_ready(just_run: str = "") -> None:
    """Register once transformers' Auto classes are loaded and no import of transformers or of this package's Hub
    modules is half-way (registering then would see half-initialised modules); `just_run` has just finished."""
    if _registered or _AUTO_CONFIG_MODULE not in sys.modules:
        return
    busy = [name for name in list(sys.modules) if _watched(name) and name != just_run]
    if any(_initializing(name) for name in busy):
        return  # retried when the import under way finishes
    try:
        register_auto_classes()
    except Exception as error:  # never break the user's import of transformers; say why instead
        _remove_hook()
        warnings.warn(f"dasheng_hf could not register with transformers' Auto classes: {error}", stacklevel=2)


class _NotifyingLoader(importlib.abc.Loader):
    """Runs a module as its own loader would, then tries the registration; everything else is the loader's."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_when_ready(just_run=module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_data, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """Until registration: watches imports of transformers and of this package's Hub modules, so the one that
    completes the Auto classes (or ends the import that loaded them) triggers the registration."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if not _watched(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader)
                return spec
        return None


_hook = _RegistrationHook()


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


if _AUTO_CONFIG_MODULE in sys.modules:
    _register_when_ready()
if not _registered:
    sys.meta_path.insert(0, _hook)
