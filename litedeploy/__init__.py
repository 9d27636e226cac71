"""litedeploy: deploy and serve chat LLMs on one modest GPU or a plain CPU."""

from litedeploy.config import EngineConfig, GenerationConfig, GuidedDecoding

__version__ = "0.1.0"
__all__ = ["EngineConfig", "GenerationConfig", "GuidedDecoding", "__version__", "pipeline"]


def __getattr__(name: str):
    # importing the engine pulls torch; keep `import litedeploy` light for the CLI's --version
    if name in ("pipeline", "Pipeline", "Response"):
        from litedeploy import api

        return getattr(api, name)
    raise AttributeError(name)
