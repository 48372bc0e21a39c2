<?php
echo "admin index";
