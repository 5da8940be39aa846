from experiments.sensitivity.study import main

main()
