from medhpm.cli import main

main()
