"""``fedmq site``: run the agent, prepare demo hospitals, export the global model."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    run = sub.add_parser("run", help="run the site agent service (trains, encrypts, publishes; applies global versions)")
    run.add_argument("--config", help="TOML settings file (FEDMQ_* environment variables override it)")
    run.set_defaults(handler=_run)

    prep = sub.add_parser(
        "prepare-demo-data",
        help="split a MedMNIST 2D dataset among N hospitals (non-IID) as DICOM / PNG / NIfTI folders with manifests",
    )
    prep.add_argument("--out", required=True, help="directory for hospital_1 ... hospital_N")
    prep.add_argument("--dataset", default="pneumoniamnist", help="MedMNIST 2D dataset name (file NAME.npz)")
    prep.add_argument("--data-root", default=None, help="folder holding NAME.npz (default: $FEDMQ_DATA_ROOT, else download)")
    prep.add_argument("--md5", default=None, help="expected MD5 for datasets without a built-in checksum")
    prep.add_argument("--sites", type=int, default=3)
    prep.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration (smaller = more skewed)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--val-fraction", type=float, default=0.15)
    prep.set_defaults(handler=_prepare)

    check = sub.add_parser(
        "check-data",
        help="check the manifest and images as the agent will load them; writes a report and a contact sheet",
    )
    check.add_argument("--config", help="TOML settings file of the site (manifest, image_size, expected_modalities)")
    check.add_argument("--out", default="data-check", help="folder for data-report.json and contact-sheet.png")
    check.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    check.set_defaults(handler=_check_data)

    resume = sub.add_parser("resume", help="lift a pause that needs a person (paused.json), after fixing its cause")
    resume.add_argument("--config", help="TOML settings file of the site")
    resume.set_defaults(handler=_resume)

    export = sub.add_parser("export-model", help="write the site's current global model as TorchScript plus its layout manifest")
    export.add_argument("--config", help="TOML settings file of the site")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(handler=_export)


def _settings(args: argparse.Namespace):  # noqa: ANN202 - imported lazily
    from fedmq.shared.settings import load_settings
    from fedmq.site_agent.settings import SiteSettings

    return load_settings(SiteSettings, args.config)


def _run(args: argparse.Namespace) -> int:
    from fedmq.shared.log import configure_logging
    from fedmq.site_agent.service import run_site

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json, component=f"site:{settings.site_id}")
    return run_site(settings)


def _check_data(args: argparse.Namespace) -> int:
    """Exit 0 when the site can train on its data, 1 when the report lists a problem."""
    import logging

    from fedmq.site_agent.data.check import check_data

    logging.basicConfig(level=logging.ERROR)  # the report lists every skipped file; no warning per file
    settings = _settings(args)
    report = check_data(settings.manifest, settings.image_size, expected_modalities=settings.expected_modalities,
                        max_unreadable_fraction=settings.max_unreadable_fraction, out_dir=Path(args.out))
    print(report.to_json() if args.json else report.render())
    return 0 if report.ok else 1


def _resume(args: argparse.Namespace) -> int:
    from fedmq.site_agent.guard import PauseFile

    settings = _settings(args)
    pause = PauseFile(settings.state_dir)
    reason = pause.reason()
    if reason is None:
        print(f"{settings.site_id} is not paused ({pause.path} does not exist)")
        return 0
    pause.clear()
    print(f"{settings.site_id}: lifted the pause ({reason}); the site contributes again at its next version")
    return 0


def resolve_dataset(name: str, data_root: str | None, md5: str | None = None) -> Path:
    from fedmq.site_agent.data import locate_medmnist

    root = data_root or os.environ.get("FEDMQ_DATA_ROOT")
    download_dir = Path(root) if root else Path.home() / ".cache" / "fedmq"
    return locate_medmnist(name, root, download_dir=download_dir, md5=md5)


def _prepare(args: argparse.Namespace) -> int:
    from fedmq.site_agent.data import prepare_demo_data

    npz = resolve_dataset(args.dataset, args.data_root, args.md5)
    summary = prepare_demo_data(npz, args.out, n_sites=args.sites, alpha=args.alpha, seed=args.seed, val_fraction=args.val_fraction)
    print(json.dumps({k: v for k, v in summary.items() if k != "sites"}, indent=2))
    for name, site in summary["sites"].items():
        print(f"{name}: {site['n']} images as {site['format']}, per class {site['per_class']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedmq.site_agent.export import export_model
    from fedmq.site_agent.runtime import SiteRuntime

    rt = SiteRuntime.open(_settings(args), load_data=False, lock=False)
    paths = export_model(rt, Path(args.out))
    for p in paths:
        print(p)
    return 0
