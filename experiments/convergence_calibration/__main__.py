from experiments.convergence_calibration.study import main

main()
