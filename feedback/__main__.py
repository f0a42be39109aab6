from feedback.cli import main

main()
