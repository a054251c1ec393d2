"""The plugin contract: every hook graphopt calls, with its documented meaning.

A plugin is a module (or object) with functions marked ``@graphopt.hookimpl``
whose names match the specs below, exposed through an entry point in the
``graphopt`` group::

    [project.entry-points.graphopt]
    my-plugin = "my_package.plugin"

The built-in passes (``graphopt.passes``) and targets (``graphopt.targets``)
register through these same hooks.

Rules graphopt enforces (see :mod:`graphopt.plugins`):

* Instrument hooks (``graphopt_pass_start``/``graphopt_pass_end``) are called
  through pluggy, so ``@graphopt.hookimpl(wrapper=True)`` wrappers,
  ``tryfirst``/``trylast`` and ``specname=`` work as pluggy documents. The two
  registration hooks are called once per plugin and cannot be wrappers.
* Whatever a hook or pass raises -- ``sys.exit()`` included, anything but
  Ctrl-C -- is reported with the plugin's name: a failure while importing or
  registering marks the plugin ``failed`` (the others keep working), a failure
  during a run stops it with a ``PluginError`` (exit code 2).
* A plugin cannot take the name of a built-in pass or target; such a plugin is
  marked ``failed``. Give a replacement its own name.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec
def graphopt_register_passes():
    """Return a list of :class:`graphopt.Pass` subclasses this plugin provides.

    Each class needs a unique kebab-case ``name``. A built-in's name fails the
    plugin; a name already taken by an earlier third-party plugin is reported
    as a warning and this plugin's class is skipped.
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
