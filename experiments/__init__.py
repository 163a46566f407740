"""The range: victim recipes, scenario files, the runner that starts victim + attacker, the report."""
