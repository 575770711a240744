"""Header and query conditions on routes (`routes[].match`): see `plugin`."""
