"""The plugin contract: every hook graphopt calls, with its documented meaning.

A plugin is a module (or object) with functions marked ``@graphopt.hookimpl``
whose names match the specs below, exposed through an entry point in the
``graphopt`` group::

    [project.entry-points.graphopt]
    my-plugin = "my_package.plugin"

The built-in passes (``graphopt.passes``) and targets (``graphopt.targets``)
register through these same hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec
def graphopt_register_passes():
    """Return a list of :class:`graphopt.Pass` subclasses this plugin provides.

    Each class needs a unique kebab-case ``name``; a name already taken by an
    earlier plugin is reported as a conflict and skipped.
    """


@hookspec
def graphopt_register_targets():
    """Return a list of :class:`graphopt.Target` subclasses this plugin provides."""


@hookspec
def graphopt_pass_start(pass_, graph, context):
    """Called before every pass runs (an instrument hook).

    ``pass_`` is the configured pass instance, ``graph`` its input Graph (do
    not modify it), ``context`` the run's :class:`graphopt.PassContext`.
    """


@hookspec
def graphopt_pass_end(pass_, graph, record, context):
    """Called after every pass with its output ``graph`` and its :class:`graphopt.PassRecord`.

    An instrument may add entries to ``record.details`` (they reach the JSON
    report); raising fails the run with an error that names this plugin.
    """
