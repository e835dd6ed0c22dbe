"""Task families (LightningModules built from nn/ blocks), registered by name.

Each family is a package ``xmodal/tasks/<family>/`` with ``config.py`` (its typed ``model`` node
and checks), ``task.py`` (the XmodalTask) and ``parallelize.py`` (how it is sharded under FSDP2).
Registered here lazily: naming a task imports only that family's nets.
"""

from xmodal.registry import TASKS
from xmodal.tasks.config import register_config

for _name, _task, _config in (
    ("caption", "caption.task:CaptionTask", "caption.config:CaptionConfig"),
    ("gan", "gan.task:AdversarialTask", "gan.config:GanModelConfig"),
    ("vae", "vae.task:VaeTask", "vae.config:VaeModelConfig"),
    ("translation", "translation.task:TranslationTask", "translation.config:TranslationConfig"),
):
    TASKS.register(_name, f"xmodal.tasks.{_task}")
    register_config(_name, f"xmodal.tasks.{_config}")
