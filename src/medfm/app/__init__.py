"""``medfm app``: a web viewer (Gradio) that runs medfm's segmentation and classification pipelines.

Upload a NIfTI file, a DICOM file or a zipped DICOM series, choose a model (a folder or a Hub id; those in the
local Hub cache are listed), run it with a live progress bar, and scroll axial, coronal and sagittal slices
with the labels drawn over them; download the label map as NIfTI and the overlay as PNG. A classifier's top
labels show as a bar chart.

    pip install "medfm[app]"
    medfm app --model ./my-segmentation-model          # http://127.0.0.1:7860

    from medfm.app import build_app
    build_app(model="org/spad-vit-base-btcv").launch()

Gradio is an optional dependency: ``import medfm.app`` works without it, and :func:`build_app` raises
:class:`AppDependencyError` (saying what to install) when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .launcher import AppDependencyError, add_app_arguments, main, require_gradio, run_app

__all__ = ["AppDependencyError", "add_app_arguments", "build_app", "main", "require_gradio", "run_app"]


def build_app(
    model: str | Sequence[str] | None = None,
    *,
    device: str | None = None,
    hub_cache: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    title: str = "medfm viewer",
    lock_model: bool = False,
):
    """Build the viewer page; call ``.launch()`` on it to serve it.

    Args:
        model: A model folder or Hub id (or several) offered first and preselected; the models of the local Hub
            cache are listed after it.
        device: Where models run (``cpu``, ``cuda``, ``cuda:1``...; default: transformers' default).
        hub_cache: The Hub cache to list models from (default: ``HF_HUB_CACHE``).
        workdir: Folder for unpacked uploads and written results (default: ``<tmp>/medfm-app``); each run gets
            a sub-folder, removed when its session ends or the next run starts. Gradio serves downloads only
            from the temporary folder and the working directory, so ``workdir`` lies in one of them.
        title: The page's title.
        lock_model: Serve only ``model``: the model box is fixed and no other folder or Hub id runs (a
            public Space; otherwise anyone could make the server load any folder or download any model).

    Returns:
        A ``gradio.Blocks``.

    Raises:
        AppDependencyError: Gradio is not installed.
        DeviceUnavailableError: ``device`` is not a device of this machine.
        ValueError: ``lock_model`` without a ``model``.
    """
    require_gradio()
    from ..cli import check_device

    check_device(device)
    from .ui import build_blocks

    models = [model] if isinstance(model, str) else list(model or ())
    return build_blocks(
        models, device=device, hub_cache=hub_cache, workdir=workdir, title=title, lock_model=lock_model
    )
