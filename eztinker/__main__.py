from eztinker.cli import main

main()
