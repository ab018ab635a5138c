"""CRIU, the external program that dumps and restores process trees: command lines, running
a dump, reading its logs (`command`).

May import: `activities.host`, `activities.contracts`, `api`.
"""
