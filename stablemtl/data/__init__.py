"""Data: file formats (``formats``), dataset sources (``sources``), the procedural world
(``synthetic``, ``mini``), split lists (``splits``) and the training mix (``mixing``)."""

from __future__ import annotations


def prepare_data(study, progress: bool = True) -> dict:
    """Stage 01: write the procedural miniatures of a ``smoke``/``demo`` run, or check the layout of the
    real datasets of a ``paper`` run; returns dataset name -> folder."""
    from stablemtl.data import mini
    from stablemtl.data.sources import SOURCES
    from stablemtl.paths import README_PAPER, StageError

    if study.procedural:
        return mini.write_mini_datasets(study.data_root, study.preset, progress=progress)
    roots, problems = study.dataset_roots(), []
    for name, root in roots.items():
        try:
            SOURCES[name](root)
        except Exception as err:  # noqa: BLE001 - collected so that one message lists every dataset
            problems.append(f"  {name}: {err}")
    if problems:
        raise StageError(f"the real datasets under {study.data_root} are incomplete:\n" + "\n".join(problems)
                         + f"\nsee {README_PAPER} for how to download and preprocess each dataset")
    return roots
