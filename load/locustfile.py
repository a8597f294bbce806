"""Every Locust user class of the project, one file per service: ``load/<model>_locust.py``.

The user classes of every such file that exists are imported here, so a new model's users are picked
up without editing this file. Settings: ``load/locust.conf``. The step-load shape lives in
``load/shape.py`` and is used only when passed too (``-f load/locustfile.py,load/shape.py``, or
``python -m load.run --shape step``). ``LOAD_MODELS=sentiment,forecast`` keeps only those models' users
(the CI smoke run uses it for the models whose artifacts are committed).

    locust --config load/locust.conf --host http://127.0.0.1:3000 [UserClass ...]
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

from locust import User, events

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `locust -f load/locustfile.py` from anywhere imports load.*
    sys.path.insert(0, str(HERE.parent))


def models() -> list[str]:
    """Model names with a Locust file: the ``<model>`` of every ``load/<model>_locust.py``."""
    return [path.stem.removesuffix("_locust") for path in sorted(HERE.glob("*_locust.py"))]


def discover(selected: list[str] | None = None) -> dict[str, list[type[User]]]:
    """User classes by model name, for every model with a Locust file (or only ``selected``)."""
    users: dict[str, list[type[User]]] = {}
    for path in sorted(HERE.glob("*_locust.py")):
        if selected is not None and path.stem.removesuffix("_locust") not in selected:
            continue
        module = importlib.import_module(f"load.{path.stem}")
        classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, User) and cls.__module__ == module.__name__ and not cls.abstract]
        users[path.stem.removesuffix("_locust")] = classes
    return users


USERS_BY_MODEL = discover([m for m in os.environ.get("LOAD_MODELS", "").split(",") if m] or None)
# Locust runs the User classes found among this module's globals (so no loop variable may hold one).
globals().update({cls.__name__: cls for classes in USERS_BY_MODEL.values() for cls in classes})
__all__ = ["USERS_BY_MODEL", *(cls.__name__ for classes in USERS_BY_MODEL.values() for cls in classes)]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    # Read by load/shape.py (settable in load/locust.conf like any other option).
    parser.add_argument("--steps", type=int, default=4, env_var="LOCUST_STEPS",
                        help="step-load shape: number of equal steps up to --users over --run-time")
