"""Fleet mode: migrations and evacuations as Temporal workflows, run by workers on many controllers.

Optional (`pip install -e .[temporal]`); the local mode never imports temporalio. Layout:
settings (the `temporal:` config section, pure), types (workflow/activity payloads, pure),
activities (survey, migrate: the same session path as `migrate run`), workflows (evacuate,
migrate), engine (connecting), worker, client (`run`/`evacuate --temporal`), schedule,
cli (argparse wiring, no temporalio import).
"""
