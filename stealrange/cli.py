"""The ``stealrange`` command: one typer app with sub-commands per side.

- victim side (``server/cli.py``): ``serve``, ``keys ...``; victims (``victims/cli.py``):
  ``train-victim``; both together (``stealrange/up.py``): ``up``
- attacker side (``attacker_client/cli.py``): ``attack list|params|rda|stolen-encoder|...``
- defenses (``defenses/cli.py``): ``defenses list|cost|train-misinformation``
- data protection (``defenses/data/cli.py``): ``protect-data``, ``evaluate-protection``
- the range (``experiments/range_cli.py``): ``run SCENARIO``, ``report RUN_DIR``
"""

from __future__ import annotations

import typer

from attacker_client.cli import attack_app
from defenses.cli import defenses_app
from defenses.data import cli as data_cli
from experiments import range_cli
from experiments.claims.cli import claims_command
from server import cli as server_cli
from stealrange.up import up
from victims.cli import train_victim_command

app = typer.Typer(
    name="stealrange",
    help="A model-stealing range: victim API, attacks over the network, and the range runner.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("run")(range_cli.run_command)
app.command("report")(range_cli.report_command)
app.command("claims")(claims_command)
app.command("up")(up)
app.command("serve")(server_cli.serve)
app.command("train-victim")(train_victim_command)
app.add_typer(server_cli.keys_app, name="keys")
app.add_typer(attack_app, name="attack")
app.add_typer(defenses_app, name="defenses")
app.command("protect-data")(data_cli.protect_data_command)
app.command("evaluate-protection")(data_cli.evaluate_protection_command)

if __name__ == "__main__":
    app()
