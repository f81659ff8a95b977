from engine.cli import main

main(role="llm")
