"""The Hub: model cards from the templates in ``medfm/model_cards``, and pushing a model with its card.

``push_to_hub(model, "org/name", processor=processor, card=CardInfo(...))`` saves the model (or PEFT
adapter), its processor and a model card with what the run knows (base model, datasets, metrics as
model-index results, training settings) and uploads them in one commit. With ``space=True`` it also makes a
Gradio Space (``org/name-demo``) that serves medfm's web viewer (:mod:`medfm.app`) on the model;
:func:`write_space` writes the same Space files to a local folder.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard

from .errors import HubUploadError, ModelNotFoundError
from .io.atomic import atomic_output

__all__ = [
    "CardInfo",
    "HubUploadError",
    "available_card_templates",
    "check_model_source",
    "looks_like_local_path",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
    "write_space",
]

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def available_card_templates() -> list[str]:
    folder = importlib.resources.files("medfm") / "model_cards"
    return sorted(p.name.removesuffix(".md") for p in folder.iterdir() if p.name.endswith(".md"))


def render_model_card(template: str, values: dict[str, Any]) -> ModelCard:
    """Fill ``{{ name }}`` placeholders of a packaged template and parse it as a :class:`ModelCard`.

    Raises:
        ValueError: Unknown template, or a placeholder without a value.
    """
    if template not in available_card_templates():
        raise ValueError(f"no model card template {template!r}; available: {available_card_templates()}")
    text = (importlib.resources.files("medfm") / "model_cards" / f"{template}.md").read_text()
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise ValueError(f"model card template {template!r} needs values for {missing}")
    return ModelCard(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text))


@dataclass
class CardInfo:
    """What a run knows about a model, for its card.

    Attributes:
        template: Card template (``available_card_templates()``).
        base_model: Hub id of the model this one was fine-tuned from.
        datasets: Hub ids or names of the training data.
        task_type: Hub task of the results, e.g. ``"image-segmentation"``.
        dataset_name: Name of the evaluation dataset.
        dataset_type: Hub id or kind of the evaluation dataset.
        metrics: Metric name -> value, written as model-index results.
        training: Training settings shown in a table (epochs, learning rate...).
        values: More template placeholder values.
        modality: Imaging modality of the training data (``CT``, ``MR``...).
        validation_size: Number of held-out validation cases the metrics come from.
    """

    template: str = "fine-tuned"
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    task_type: str = "image-segmentation"
    dataset_name: str | None = None
    dataset_type: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    validation_size: int | None = None


def _enrich(card: ModelCard, info: CardInfo, model_name: str) -> ModelCard:
    from .cards import hub_ids, metric_type

    base_ids = hub_ids(info.base_model)
    if base_ids:
        card.data.base_model = base_ids[0]
    dataset_ids = hub_ids(info.datasets)
    card.data.datasets = dataset_ids or None
    finite = {name: float(value) for name, value in info.metrics.items() if _finite(value)}
    if finite:
        card.data.model_name = model_name
        card.data.eval_results = [
            EvalResult(
                task_type=info.task_type,
                dataset_type=(hub_ids(info.dataset_type) or dataset_ids or ["custom"])[0],
                dataset_name=info.dataset_name or "custom",
                metric_type=metric_type(name),
                metric_name=name,
                metric_value=value,
            )
            for name, value in finite.items()
        ]
    if info.datasets:
        listed = ", ".join(f"`{d}`" for d in info.datasets)
        card.text += f"\n## Training data\n\n{listed}\n"
    if info.training:
        rows = "\n".join(f"| {key} | {value} |" for key, value in info.training.items())
        card.text += f"\n## Training settings\n\n| setting | value |\n| --- | --- |\n{rows}\n"
    if info.metrics:
        rows = "\n".join(
            f"| {name} | {float(value):.4f} |" if _finite(value) else f"| {name} | n/a (not computable) |"
            for name, value in info.metrics.items()
        )
        card.text += f"\n## Results\n\n| metric | value |\n| --- | --- |\n{rows}\n"
    return card


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    processor: Any = None,
    card: CardInfo | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with medfm",
    api: HfApi | None = None,
    space: bool = False,
    space_id: str | None = None,
) -> Any:
    """Save ``model`` (a medfm model or a PEFT model: then the adapter), its processor and a card; upload
    them to ``repo_id`` in one commit. With ``space=True``, also create a Gradio Space that serves medfm's web
    viewer on the model (:func:`write_space`'s files) and upload it.

    Args:
        model: What to push (``save_pretrained`` is called on it).
        repo_id: ``org/name`` on the Hub.
        processor: The image processor to push beside it.
        card: What to write in the card; a plain card from the ``fine-tuned`` template by default.
        private: Create the repository as private.
        token: Hub token (else the logged-in one).
        commit_message: Message of the commit.
        api: The :class:`huggingface_hub.HfApi` to use (tests pass a recording one).
        space: Also create and upload a Space (``sdk: gradio``) whose ``app.py`` serves the viewer on
            ``repo_id``. A Space of a private model needs an ``HF_TOKEN`` secret to load it.
        space_id: The Space's id; ``<repo_id>-demo`` by default.

    Returns:
        What ``api.upload_folder`` returns for the model (a ``CommitInfo``).

    Raises:
        HubUploadError: The Hub is off (``HF_HUB_OFFLINE``) or unreachable, or refuses the repository (or the
            Space): raised before anything is written. Or an upload failed: the prepared folder is kept and the
            message says where.
        ValueError: ``space_id`` is not a valid repository id.
    """
    from huggingface_hub.constants import is_offline_mode

    if api is None and is_offline_mode():
        raise HubUploadError(
            f"cannot push to {repo_id}: the Hub is off (HF_HUB_OFFLINE is set); unset it, or save the model with "
            "save_pretrained and upload the folder later"
        )
    if space:
        space_id = space_id or f"{repo_id}-demo"
        _check_repo_id(space_id, "space_id")
    api = api or HfApi(token=token)
    info = card or CardInfo()
    # The repositories first: without a network or rights nothing is written, and the message says why.
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    except Exception as error:  # requests/httpx connection errors, HfHubHTTPError (401, 403...)
        raise HubUploadError(f"cannot create or reach {repo_id} on the Hub ({_first_line(error)})") from error
    if space:
        try:
            api.create_repo(
                space_id, private=private, exist_ok=True, token=token, repo_type="space", space_sdk="gradio"
            )
        except Exception as error:
            raise HubUploadError(
                f"cannot create or reach the Space {space_id} on the Hub ({_first_line(error)})"
            ) from error
    folder = Path(tempfile.mkdtemp(prefix="medfm-push-"))
    try:
        _save_for_hub(model, folder, repo_id)
        if processor is not None:
            processor.save_pretrained(folder)
        write_model_card(info.template, folder, repo_id=repo_id, info=info)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        result = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token
        )
    except Exception as error:
        # The prepared folder is kept: nothing of the run is lost, and it can be uploaded as it is.
        raise HubUploadError(
            f"uploading to {repo_id} failed ({_first_line(error)}); the prepared folder is kept at {folder}: "
            f"upload it with `hf upload {repo_id} {folder}`"
        ) from error
    card_data = ModelCard.load(folder / "README.md").data if space else None
    shutil.rmtree(folder, ignore_errors=True)
    if space:
        _push_space(api, str(space_id), repo_id, card_data, token, commit_message)
    return result


def _push_space(
    api: Any, space_id: str, repo_id: str, card_data: Any, token: str | None, message: str
) -> None:
    """Write the viewer Space of ``repo_id`` and upload it to ``space_id`` (the model is already uploaded)."""
    folder = Path(tempfile.mkdtemp(prefix="medfm-space-"))
    try:
        write_space(
            folder,
            repo_id,
            license=getattr(card_data, "license", None),
            license_name=getattr(card_data, "license_name", None),
            license_link=getattr(card_data, "license_link", None),
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        api.upload_folder(
            repo_id=space_id, folder_path=folder, commit_message=message, token=token, repo_type="space"
        )
    except Exception as error:
        raise HubUploadError(
            f"the model is on the Hub as {repo_id}, but uploading its Space {space_id} failed "
            f"({_first_line(error)}); the Space's files are kept at {folder}: upload them with "
            f"`hf upload --repo-type space {space_id} {folder}`"
        ) from error
    shutil.rmtree(folder, ignore_errors=True)


def _check_repo_id(repo_id: str, name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{name} {repo_id!r} is not a Hub repository id ({_first_line(error)})") from None


#: The Gradio release the viewer was last tested with: the Space's ``sdk_version`` when Gradio is not installed.
TESTED_GRADIO_VERSION = "6.31.0"

_SPACE_APP = """\
# A Hugging Face Space serving medfm's web viewer on {model_id}.
from medfm.app import build_app

# lock_model: the Space serves this model only (visitors cannot make it download others).
build_app(model="{model_id}", lock_model=True).launch()
"""

_SPACE_BODY = """
# {title}

A web viewer for [{model_id}](https://huggingface.co/{model_id}), served by
[medfm](https://github.com/medfm/medfm)'s `medfm.app`: upload a NIfTI file, a DICOM file or a zipped DICOM
series, run the model, scroll the axial, coronal and sagittal slices with the labels drawn over them, and
download the label map (NIfTI, on the uploaded image's grid) and the overlay (PNG).

Run it on your own machine with `pip install "medfm[app]"` and `medfm app --model {model_id}`.

Research use only: not for clinical decisions. Uploaded images are processed on this Space's machine.
"""


def write_space(
    folder: str | os.PathLike,
    model_id: str,
    *,
    title: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    sdk_version: str | None = None,
    medfm_requirement: str | None = None,
) -> Path:
    """Write a Hugging Face Space that serves medfm's web viewer on a model: ``app.py``, ``requirements.txt``
    and a ``README.md`` with the Space metadata (``sdk: gradio``, ``app_file``, ``models``...). Each file is
    written atomically; other files in ``folder`` are left alone.

    Args:
        folder: The Space's folder (made if missing).
        model_id: The model's Hub id, preselected in the viewer and listed in the metadata.
        title: The Space's title; the model's name by default.
        license: License id of the metadata (the model's; ``other`` when not given).
        license_name: With ``license="other"``: its name.
        license_link: With ``license="other"``: where to read it.
        sdk_version: Gradio version the Space runs; the installed one, else :data:`TESTED_GRADIO_VERSION`.
        medfm_requirement: The ``requirements.txt`` line for medfm; ``medfm[app]>=<this version>`` by default.

    Returns:
        ``folder``.

    Raises:
        ValueError: ``model_id`` is not a Hub repository id (a local path: a Space cannot read it).
    """
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import SpaceCard, SpaceCardData

    from . import __version__

    _check_repo_id(model_id, "model_id")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sdk_version is None:
        try:
            sdk_version = version("gradio")
        except PackageNotFoundError:
            sdk_version = TESTED_GRADIO_VERSION
    title = title or f"{model_id.split('/')[-1]} viewer"
    extra = {"license_name": license_name, "license_link": license_link} if license_name else {}
    data = SpaceCardData(
        title=title[:60],
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        models=[model_id],
        license=license or "other",
        tags=["medfm", "medical-imaging"],
        emoji="🩻",
        colorFrom="blue",
        colorTo="gray",
        pinned=False,
        short_description=f"medfm viewer for {model_id}"[:60],
        **extra,
    )
    card = SpaceCard(f"---\n{data.to_yaml()}\n---\n" + _SPACE_BODY.format(title=title, model_id=model_id))
    requirement = medfm_requirement or f"medfm[app]>={__version__}"
    files = {
        "app.py": _SPACE_APP.format(model_id=model_id),
        "requirements.txt": (
            f"# medfm and its web viewer (the app extra: Gradio); written by medfm {__version__}.\n{requirement}\n"
        ),
        "README.md": str(card),
    }
    for name, text in files.items():
        with atomic_output(folder / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    return folder


def _save_for_hub(model: Any, folder: Path, repo_id: str) -> None:
    """``model.save_pretrained``; a PEFT model is saved as a self-contained adapter folder (the fine-tuned
    config naming its base, see :func:`medfm.peft.save_adapter`) whose adapter config names the repository."""
    if not callable(getattr(model, "get_base_model", None)):
        model.save_pretrained(folder)
        return
    import json

    from .models.registry import family_of
    from .peft import save_adapter

    base = model.get_base_model()
    models = family_of(base).configs[type(base.config)]
    auto_class = next(auto for auto, cls in models.items() if cls is type(base))
    config = model.peft_config[model.active_adapter]
    source = getattr(base.config, "medfm_base_model", None) or config.base_model_name_or_path
    save_adapter(model, folder, base_model=str(source), auto_class=auto_class)
    adapter_file = folder / "adapter_config.json"
    settings = json.loads(adapter_file.read_text())
    settings["base_model_name_or_path"] = repo_id  # the uploaded folder is itself what PEFT loads
    adapter_file.write_text(json.dumps(settings, indent=2))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def write_model_card(
    template: str,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
    info: CardInfo | None = None,
) -> Path:
    """Write ``folder/README.md`` from a template (atomically).

    Args:
        template: Template name (``spad-vit-base``, ``spad-vt``...).
        folder: The model folder.
        repo_id: Hub id shown in the usage snippet; defaults to the folder name.
        base_model: Set as ``base_model`` in the card metadata (fine-tuned models).
        extra: More placeholder values (``source_checkpoint``...).
        info: Run facts (datasets, metrics, training settings) to add; see :class:`CardInfo`.
    """
    from .cards import folder_facts, hub_ids

    folder = Path(folder)
    name = (repo_id or folder.name).split("/")[-1]
    base = base_model or (info.base_model if info is not None else None)
    facts = folder_facts(folder)
    values = {
        "model_name": name,
        "repo_id": repo_id or folder.name,
        "source_checkpoint": "an original checkpoint",
        "base_model": base or "a medfm model",
        "subfolder_argument": "",
        "parity_statement": _UNVERIFIED,
        "validation_section": "",
        **{k: v for k, v in facts.items() if not k.startswith("_")},
    }
    if info is not None:
        values["validation_section"] = _validation_section(info)
    values.update(extra or {})
    if info is not None:
        values.update(info.values)
    card = render_model_card(template, values)
    # Metadata the Hub validates: the task's pipeline tag, a named license, ids (not local paths).
    if "_pipeline_tag" in facts:
        card.data.pipeline_tag = facts["_pipeline_tag"]
    if card.data.license == "other" and "_license_name" in facts:
        card.data.license_name = facts["_license_name"]
        card.data.license_link = facts["_license_link"] or None
    base_ids = hub_ids(base)
    card.data.base_model = base_ids[0] if base_ids else None
    if info is not None:
        if info.task_type == CardInfo.task_type and "_pipeline_tag" in facts:
            info = dataclasses.replace(info, task_type=facts["_pipeline_tag"])  # the model's own task
        card = _enrich(card, info, name)
    with atomic_output(folder / "README.md") as tmp:
        Path(tmp).write_text(str(card))
    return folder / "README.md"


_UNVERIFIED = (
    "The conversion was **not verified** against reference outputs of the original code for this checkpoint "
    "(pass the original code's outputs to the converter, `--reference`, to check it); medfm's tests check the "
    "conversion code on small models built with the original code."
)


def _validation_section(info: CardInfo) -> str:
    lines = []
    if info.modality:
        lines.append(f"- Modality: {info.modality}")
    if info.validation_size is not None:
        cases = "case" if info.validation_size == 1 else "cases"
        lines.append(f"- Validation: {info.validation_size} held-out {cases}, never seen in training")
    return ("## Data\n\n" + "\n".join(lines) + "\n") if lines else ""


def looks_like_local_path(name: str) -> bool:
    """Whether a model reference can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    if (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(("/", os.sep))
        or os.sep in name.replace("/", "", 1)
    ):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_model_source(model: str, option: str = "--model") -> None:
    """Refuse a model reference that names a local path which is not there, before anything is loaded.

    Raises:
        ModelNotFoundError: ``model`` can only be a local path and no such folder exists.
    """
    if not Path(model).expanduser().exists() and looks_like_local_path(model):
        raise ModelNotFoundError(
            f"no such folder; {option} takes a model folder or a Hub id (org/name)", model
        )
