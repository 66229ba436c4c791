"""``cn2mirror show``, ``explain`` and ``ids``: what the datapath does, and why.

``show`` reads the maps pinned under the pin root (agent/pinned.py) without compiling
anything, so it works while the agent runs and after it died. Numbers in the maps (rule,
destination and interface slots) are turned into names with the names file the agent
writes, ``<state dir>/names.json`` (agent/node.py describe()); without it, numbers only.

``explain`` loads objects from files, compiles one node's state and says which policies
and rules a flow matches and where its copies go (agent/compiler.py explain()); with
``--pin-root`` it also shows what the datapath's flow table holds for that flow.

``ids`` maps mirror and session identifiers (what an analyzer sees in jmirror headers)
back to policy rules, port mirrors and pod interfaces.

The package, one module a concern: common.py (options, opening the pins, names),
decode.py (map values), collect.py (pins -> rows), tables.py (rows -> tables),
commands.py (the ``show`` group), explain.py, ids.py. names.json and status.json are
read through agent/statefiles.py, the pins through agent/pinned.py: the agent's
/metrics reads them the same way.

The JSON shapes are stable, carry "version": 1 and are documented in docs/cli.md.
Exit codes: 0 success, 1 failure (nothing pinned, no privilege, unknown id), 2 usage.
"""
