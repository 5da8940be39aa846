from experiments.capacity_factor.study import main

main()
