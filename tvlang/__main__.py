from tvlang.cli import run

run()
