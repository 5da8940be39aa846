from experiments.scale_out.study import main

main()
