from engine.cli import main

main(role="slm")
