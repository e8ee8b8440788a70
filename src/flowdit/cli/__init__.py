"""The ``flowdit`` command line: ``train``, ``sample``, ``eval``, ``evaluator train``,
``invert``, ``edit``, ``restore``, ``reflow pairs``, ``bench accel``.

Every command takes ``--help`` (each option with its default). Errors in arguments,
configs, data, checkpoints or output locations are printed as one line naming the
problem (``flowdit: error: ...``), exit status 2, and are found before any training or
sampling starts. ``flowdit train`` takes ``key=value`` overrides anywhere after the
command.

One module per command group: ``train``, ``sample``, ``evaluate`` (``eval``),
``evaluator``, ``reflow``, ``edit`` (``invert``, ``edit``, ``restore``), ``bench``
(``sample_diffusers``: ``flowdit sample --diffusers PATH``); ``common``
holds the parser class, option types and checks they share, ``main`` the assembled parser.
"""

from flowdit.cli.bench import cmd_bench_accel
from flowdit.cli.edit import cmd_edit, cmd_invert, cmd_restore
from flowdit.cli.evaluate import cmd_eval
from flowdit.cli.evaluator import cmd_evaluator_train
from flowdit.cli.main import build_parser, main
from flowdit.cli.reflow import cmd_reflow_pairs
from flowdit.cli.sample import cmd_sample
from flowdit.cli.train import cmd_train

__all__ = ["build_parser", "main", "cmd_bench_accel", "cmd_edit", "cmd_eval", "cmd_evaluator_train", "cmd_invert",
           "cmd_reflow_pairs", "cmd_restore", "cmd_sample", "cmd_train"]
