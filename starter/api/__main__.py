from starter.api.app import main

main()
