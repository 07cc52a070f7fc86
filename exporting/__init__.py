"""The exports and their checks: each artifact made, loaded in the program that will load it, compared, published."""
