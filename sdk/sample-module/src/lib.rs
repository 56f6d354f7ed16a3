//! The sample module that evp-devhub deploys: a small native program.
