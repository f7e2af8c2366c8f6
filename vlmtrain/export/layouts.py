"""Every export layout by name: vlmtrain's own (:mod:`.vlmtrain_layout`) and each family's native checkpoint
(:attr:`vlmtrain.families.assembled.Family.native_layout`); and reading an export back (:func:`read_export`).
A new layout is one module and one entry here."""

from __future__ import annotations

from pathlib import Path

from vlmtrain.errors import UserError
from vlmtrain.export.format import (
    CONFIG_FILE,
    VISION_DIR,
    ExportConfig,
    Layout,
    check_description,
    check_weights,
    read_config,
)
from vlmtrain.export.vlmtrain_layout import VLMTRAIN_LAYOUT
from vlmtrain.families import FAMILIES

LAYOUTS: dict[str, Layout] = {
    VLMTRAIN_LAYOUT.name: VLMTRAIN_LAYOUT,
    **{family.native_layout.name: family.native_layout for family in FAMILIES if family.native_layout is not None},
}


def read_export(folder: Path) -> tuple[ExportConfig, Layout]:
    """The config and layout of the export ``folder``, its weights files the ones it wrote, its description
    checked against the copy they keep, its language model (and adapter) folders present; one line naming the
    file when not."""
    config = read_config(folder)
    layout = LAYOUTS.get(config.layout)
    if layout is None:
        raise UserError(f"{folder / VISION_DIR / CONFIG_FILE}: layout {config.layout!r} is not one of {', '.join(LAYOUTS)}")
    check_weights(folder, config)
    check_description(folder, config, layout.weights_file(folder))
    for name in filter(None, (layout.lm_folder, config.adapter)):
        if not (folder / name).is_dir():
            raise UserError(f"{folder / name}: missing (not a complete vlmtrain export)")
    return config, layout
