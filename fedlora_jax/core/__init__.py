"""The ground floor: errors, array types, numeric floors, the names a config may choose (choices)
and the key tree (randomness). These modules import nothing of ours but each other."""
