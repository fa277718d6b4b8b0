"""The web viewer's page: a Gradio ``Blocks`` layout wired to the plain functions of :mod:`medfm.app.viewer`.

Imported only by :func:`medfm.app.build_app`, which checks first that Gradio is installed.
"""

from __future__ import annotations

import os

# No usage statistics or version check from a medical viewer: set before Gradio is imported (an explicit
# GRADIO_ANALYTICS_ENABLED=True in the environment still wins).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from . import viewer

__all__ = ["build_blocks"]

logger = logging.getLogger(__name__)

HELP = """\
Upload a CT or MR volume: **NIfTI** (`.nii`, `.nii.gz`), a **DICOM** file, or a DICOM series as a **`.zip`** of
its slices. 2D pictures (PNG, JPEG) are not read by medfm yet. Choose a segmentation model or an image classifier
(a model folder or a Hub id; models in the local Hub cache are listed) and press **Run**.

Views follow the radiological convention: axial and coronal show the patient's right on the image's left,
superior and anterior at the top; letters at the edges give the directions. The label map downloads as NIfTI on
the uploaded image's own grid. Research use only: not for clinical decisions.
"""

# Views of different aspect ratios get one height on the page, so their sliders line up.
_VIEW_HEIGHT = 360

_SLIDER_NAMES = {
    "axial": "Axial slice (S → I)",
    "coronal": "Coronal slice (A → P)",
    "sagittal": "Sagittal slice (R → L)",
}


def build_blocks(
    models: Sequence[str] = (),
    *,
    device: str | None = None,
    hub_cache: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    title: str = "medfm viewer",
    lock_model: bool = False,
) -> gr.Blocks:
    """The viewer page (see :func:`medfm.app.build_app`)."""
    pipelines = viewer.PipelineCache(device)
    root = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / "medfm-app"
    root.mkdir(parents=True, exist_ok=True)
    given = [m for m in models if m]

    allowed = given if lock_model else None
    if lock_model and not given:
        raise ValueError("lock_model=True needs the model to serve (model=...)")

    def choices() -> list[tuple[str, str]]:
        return [(m, m) for m in given] if lock_model else viewer.model_choices(given, hub_cache)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as blocks:
        case_state = gr.State(
            None, delete_callback=lambda case: viewer.remove_folder(getattr(case, "folder", None))
        )
        gr.Markdown(f"# {title}")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label="Image (NIfTI, DICOM, zipped DICOM series)", elem_id="medfm-upload")
                initial = choices()
                model_box = gr.Dropdown(
                    choices=initial,
                    value=given[0] if given else (initial[0][1] if initial else None),
                    allow_custom_value=not lock_model,
                    interactive=not lock_model,
                    label="Model" if lock_model else "Model (folder or Hub id)",
                    info=None if lock_model else "Pick one, or type a folder or org/name",
                    elem_id="medfm-model",
                )
                refresh = gr.Button(
                    "Rescan Hub cache", size="sm", visible=not lock_model, elem_id="medfm-refresh"
                )
                run = gr.Button("Run", variant="primary", elem_id="medfm-run")
                status = gr.Markdown("Upload an image and choose a model.", elem_id="medfm-status")
                with gr.Accordion("Options", open=False):
                    top_k = gr.Slider(
                        1, 20, value=5, step=1, label="Classification: top-k labels", elem_id="medfm-topk"
                    )
                    overlap = gr.Slider(
                        0,
                        0.75,
                        value=0.5,
                        step=0.05,
                        label="Segmentation: window overlap",
                        elem_id="medfm-overlap",
                    )
                    bfloat16 = gr.Checkbox(False, label="bfloat16 autocast (faster on recent CPUs and GPUs)")
            with gr.Column(scale=3):
                welcome = gr.Markdown(HELP, elem_id="medfm-help")
                with gr.Group(visible=False, elem_id="medfm-segmentation") as segmentation_group:
                    images, sliders = {}, {}
                    with gr.Row(equal_height=True):
                        for name in viewer.VIEWS:
                            with gr.Column(min_width=200):
                                images[name] = gr.Image(
                                    label=name,
                                    type="numpy",
                                    format="png",
                                    interactive=False,
                                    buttons=["fullscreen"],
                                    height=_VIEW_HEIGHT,
                                    elem_id=f"medfm-view-{name}",
                                )
                                sliders[name] = gr.Slider(
                                    0,
                                    1,
                                    value=0,
                                    step=1,
                                    label=_SLIDER_NAMES[name],
                                    elem_id=f"medfm-slider-{name}",
                                )
                    with gr.Row():
                        opacity = gr.Slider(
                            0, 1, value=0.45, step=0.05, label="Label opacity", elem_id="medfm-opacity"
                        )
                        shown = gr.CheckboxGroup(label="Labels shown", elem_id="medfm-labels")
                    legend = gr.HTML(elem_id="medfm-legend")
                    volumes = gr.Dataframe(
                        headers=["label", "name", "voxels", "volume (ml)"],
                        datatype=["number", "str", "number", "number"],
                        label="Volume per label",
                        interactive=False,
                        elem_id="medfm-volumes",
                    )
                    with gr.Row():
                        label_map = gr.DownloadButton(
                            "Download label map (NIfTI)", visible=False, elem_id="medfm-download-nifti"
                        )
                        overlay = gr.DownloadButton(
                            "Download overlay (PNG)", visible=False, elem_id="medfm-download-png"
                        )
                with gr.Group(visible=False, elem_id="medfm-classification") as classification_group:
                    scores = gr.Label(label="Top labels", elem_id="medfm-scores")
                    score_table = gr.Dataframe(
                        headers=["rank", "label", "score"],
                        datatype=["number", "str", "number"],
                        label="Scores",
                        interactive=False,
                        elem_id="medfm-score-table",
                    )

        view_outputs = [images[name] for name in viewer.VIEWS]

        def _draw(case: viewer.SegmentationCase, indices: dict[str, int], alpha: float, visible: list[int]):
            pictures = [
                viewer.render_view(case, name, indices[name], opacity=alpha, visible=visible)
                if name in case.views()
                else None
                for name in viewer.VIEWS
            ]
            png = viewer.render_overlay_png(
                case,
                indices,
                case.folder / f"{viewer.file_stem(case.name)}_overlay.png",
                opacity=alpha,
                visible=visible,
            )
            return pictures, png

        def on_run(
            file: Any,
            model: str | None,
            k: float,
            window_overlap: float,
            bf16: bool,
            previous: Any,
            progress=gr.Progress(),  # noqa: B008  (Gradio injects it)
        ):
            if previous is not None:
                viewer.remove_folder(getattr(previous, "folder", None))
            upload = None if file is None else (file if isinstance(file, str) else file.name)
            outcome = viewer.analyse(
                upload,
                model,
                pipelines,
                root,
                top_k=int(k),
                overlap=float(window_overlap),
                bfloat16=bool(bf16),
                allowed=allowed,
                progress=lambda fraction, text: progress(fraction, desc=text),
            )
            hidden = {
                case_state: None,
                status: outcome.status,
                welcome: gr.update(visible=True),
                segmentation_group: gr.update(visible=False),
                classification_group: gr.update(visible=False),
            }
            if outcome.error:
                return hidden
            if outcome.case is None:  # a classifier's scores
                return {
                    **hidden,
                    welcome: gr.update(visible=False),
                    classification_group: gr.update(visible=True),
                    scores: gr.update(value=outcome.scores, num_top_classes=len(outcome.scores or {})),
                    score_table: outcome.table,
                }
            case = outcome.case
            centre = case.centre()
            every = list(case.names)
            pictures, png = _draw(case, centre, 0.45, every)
            outputs: dict[Any, Any] = {
                case_state: case,
                welcome: gr.update(visible=False),
                segmentation_group: gr.update(visible=True),
                classification_group: gr.update(visible=False),
                opacity: 0.45,
                shown: gr.update(choices=[(name, value) for value, name in case.names.items()], value=every),
                legend: viewer.legend_html(case, every),
                volumes: viewer.volume_table(case),
                label_map: gr.update(value=str(case.label_map), visible=True),
                overlay: gr.update(value=str(png), visible=True),
                status: outcome.status,
            }
            for name, (fixed, _, _) in viewer.VIEWS.items():
                outputs[images[name]] = gr.update(
                    value=pictures[list(viewer.VIEWS).index(name)], visible=name in case.views()
                )
                outputs[sliders[name]] = gr.update(
                    minimum=0,
                    maximum=max(case.shape[fixed] - 1, 1),
                    value=centre[name],
                    visible=name in case.views(),
                )
            return outputs

        def on_view_change(
            case: Any, axial: float, coronal: float, sagittal: float, alpha: float, visible: list[int]
        ):
            if case is None:
                return [gr.skip()] * 5
            indices = {"axial": int(axial), "coronal": int(coronal), "sagittal": int(sagittal)}
            pictures, png = _draw(case, indices, alpha, visible or [])
            return [*pictures, viewer.legend_html(case, visible or []), str(png)]

        run_outputs = [
            case_state,
            status,
            welcome,
            segmentation_group,
            classification_group,
            *view_outputs,
            *sliders.values(),
            opacity,
            shown,
            legend,
            volumes,
            label_map,
            overlay,
            scores,
            score_table,
        ]
        run.click(
            on_run,
            inputs=[upload, model_box, top_k, overlap, bfloat16, case_state],
            outputs=run_outputs,
            concurrency_limit=1,
            concurrency_id="medfm-model",
            show_progress_on=[welcome, *view_outputs, scores],
        )
        view_inputs = [case_state, *sliders.values(), opacity, shown]
        for control in [*sliders.values(), opacity, shown]:
            control.input(
                on_view_change,
                inputs=view_inputs,
                outputs=[*view_outputs, legend, overlay],
                show_progress="hidden",
                trigger_mode="always_last",
                concurrency_limit=4,
            )
        refresh.click(
            lambda current: gr.update(choices=choices(), value=current), inputs=model_box, outputs=model_box
        )
    return blocks
