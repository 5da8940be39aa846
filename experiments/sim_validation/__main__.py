from experiments.sim_validation.study import main

main()
