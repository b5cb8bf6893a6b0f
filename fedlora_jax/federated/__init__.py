"""The federated round: local training (client.py), the server optimizer (server.py), aggregation,
the FL algorithms, cohort sampling, the device mesh and chunk plan, and simulation.py, which composes
them (with a privacy mechanism) into one jitted round. Imports the config, models, adapters, data
and privacy mechanisms; nothing about run folders."""
