from ssql_deploy.cli import main

main()
